"""A single-node Apache Kafka broker that sec-online runs itself.

The broker runs in KRaft mode, with one process that is both broker and controller, on
127.0.0.1. No Kafka distribution is needed. Maven resolves the ``kafka_2.13`` jar and its
runtime dependencies from Maven Central once per Kafka version into
``<cache_dir>/kafka/<version>/libs``. The broker folder (``<cache_dir>/broker`` by default)
contains the configuration, the data (``log.dirs``), the logs and a pid file, so a later
``start`` finds the same data and the same cluster id.

Example::

    broker = ManagedBroker(Settings.from_env())
    status = broker.start()  # returns once the broker responds to a metadata request
    ...
    broker.stop()
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sec_online.kafka_admin import BrokerUnavailable, describe_cluster
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

# log4j 2 version that each Kafka release depends on. The slf4j 2 binding added to the jar set
# must match it. For other Kafka versions, ensure_jars reads the version off the resolved
# log4j-core jar and resolves again when the first guess was wrong.
LOG4J_VERSIONS = {"4.1.1": "2.24.3"}
DEFAULT_LOG4J_VERSION = "2.24.3"
# The kafka_2.13 4.1.1 pom brings slf4j-api 1.7.36 but no slf4j binding, so the broker would log
# nothing. The added log4j-slf4j2-impl binding needs slf4j-api 2.
SLF4J_VERSION = "2.0.17"
MIN_JAVA_MAJOR = 17  # Kafka 4.x brokers require Java 17 or newer.
JVM_HEAP = "-Xmx512m"
MAVEN_TIMEOUT_S = 900.0
TOOL_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 25
JARS_MARKER = "jars.json"
BROKER_MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class BrokerError(RuntimeError):
    """The managed broker could not be set up, started or stopped."""


@dataclass(frozen=True)
class BrokerStatus:
    """State of the managed broker as seen from its pid file and the process table."""

    running: bool
    pid: int | None
    bootstrap: str
    version: str
    data_dir: Path
    log_file: Path
    cluster_id: str | None = None


@dataclass(frozen=True)
class _PidRecord:
    pid: int
    bootstrap: str
    version: str


class ManagedBroker:
    """Kafka ``settings.kafka_version`` on 127.0.0.1, started and stopped by sec-online.

    Parameters
    ----------
    settings
        Supplies ``kafka_version``, ``broker_port``, ``controller_port`` and ``cache_dir``.
    home
        Folder for configuration, data, logs and the pid file. Defaults to
        ``settings.cache_dir / "broker"``. Jars always live under ``settings.cache_dir``, so
        brokers with different homes share one download.
    """

    def __init__(self, settings: Settings, home: Path | None = None) -> None:
        _check_ports(settings.broker_port, settings.controller_port)
        self.settings = settings
        self.version = settings.kafka_version
        self.home = Path(home) if home is not None else settings.cache_dir / "broker"
        self.jar_dir = settings.cache_dir / "kafka" / self.version
        self.bootstrap = f"127.0.0.1:{settings.broker_port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # Layout of the broker folder.
    @property
    def data_dir(self) -> Path:
        """Kafka ``log.dirs``: topic partitions and the KRaft metadata log."""
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        """Broker log written by log4j."""
        return self.home / "logs" / "server.log"

    @property
    def console_file(self) -> Path:
        """Standard output and error of the JVM, where crashes before log4j starts end up."""
        return self.home / "logs" / "console.log"

    @property
    def pid_file(self) -> Path:
        """JSON with the pid and the bootstrap address of the running broker."""
        return self.home / "broker.pid"

    @property
    def properties_file(self) -> Path:
        """Kafka ``server.properties`` written on each start."""
        return self.home / "config" / "server.properties"

    @property
    def log4j_file(self) -> Path:
        """log4j 2 configuration of the broker."""
        return self.home / "config" / "log4j2.properties"

    # Jars.
    def ensure_jars(self) -> Path:
        """Resolve the Kafka jars with Maven unless a complete set is already cached.

        Returns
        -------
        Path
            The ``libs`` folder, for a ``-cp 'libs/*'`` class path.

        Raises
        ------
        BrokerError
            If ``mvn`` or ``java`` is missing, or Maven fails. The message contains the tail of
            Maven's output.
        """
        libs = self.jar_dir / "libs"
        if _jars_complete(self.jar_dir):
            return libs
        self.jar_dir.mkdir(parents=True, exist_ok=True)
        # The lock keeps two processes from resolving into one folder at the same time.
        with _file_lock(self.jar_dir / ".lock"):
            if _jars_complete(self.jar_dir):
                return libs
            self._resolve_jars(libs)
        return libs

    def _resolve_jars(self, libs: Path) -> None:
        mvn = _require_tool("mvn", "install Apache Maven 3 (Debian: apt-get install maven)")
        _require_java()
        started = time.monotonic()
        logger.info(
            "resolving Kafka jars from Maven Central version=%s libs=%s", self.version, libs
        )
        log4j = LOG4J_VERSIONS.get(self.version, DEFAULT_LOG4J_VERSION)
        self._run_maven(mvn, libs, log4j)
        found = _bundled_log4j_version(libs)
        if found is not None and found != log4j:
            logger.info("Kafka %s depends on log4j %s, resolving again", self.version, found)
            self._run_maven(mvn, libs, found)
        jars = _check_jar_set(libs, self.version)
        _write_json_atomic(self.jar_dir / JARS_MARKER, {"version": self.version, "jars": jars})
        logger.info(
            "resolved Kafka jars version=%s jars=%d duration_s=%.1f",
            self.version,
            len(jars),
            time.monotonic() - started,
        )

    def _run_maven(self, mvn: str, libs: Path, log4j_version: str) -> None:
        # A folder without the marker may contain a half-finished download, so it is emptied first.
        (self.jar_dir / JARS_MARKER).unlink(missing_ok=True)
        shutil.rmtree(libs, ignore_errors=True)
        pom = self.jar_dir / "pom.xml"
        pom.write_text(_pom_xml(self.version, log4j_version), encoding="utf-8")
        command = [
            mvn,
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ]
        result = _run(command, cwd=self.jar_dir, timeout_s=MAVEN_TIMEOUT_S, what="Maven")
        if result.returncode != 0:
            raise BrokerError(
                f"Maven failed to resolve org.apache.kafka:kafka_2.13:{self.version} "
                f"(exit code {result.returncode}). Check the version (SEC_KAFKA_VERSION) and "
                f"that Maven Central is reachable. Maven output ends with:\n"
                f"{_tail_text(result.stdout)}"
            )

    # Lifecycle.
    def status(self) -> BrokerStatus:
        """Return the broker's state. A pid file whose process is gone counts as stopped."""
        record = self._live_pid_record()
        return BrokerStatus(
            running=record is not None,
            pid=record.pid if record else None,
            bootstrap=record.bootstrap if record else self.bootstrap,
            version=record.version if record else self.version,
            data_dir=self.data_dir,
            log_file=self.log_file,
            cluster_id=_read_cluster_id(self.data_dir),
        )

    def start(self, timeout_s: float = 60.0) -> BrokerStatus:
        """Start the broker and wait until it responds to a metadata request.

        Parameters
        ----------
        timeout_s
            Seconds to wait for the started JVM to respond. Resolving jars the first time and
            formatting the storage come before and are not counted.

        Returns
        -------
        BrokerStatus
            Status of the running broker. If this folder's broker already runs, its status.

        Raises
        ------
        BrokerError
            If a port is taken, the process exits early or does not answer in time. The
            message contains the last lines of the broker's log.
        """
        started = time.monotonic()
        with _file_lock(self._lock_path()):
            current = self.status()
            if current.running:
                return self._already_running(current)
            java = _require_java()
            for port in (self.settings.broker_port, self.settings.controller_port):
                _check_port_free(port)
            libs = self.ensure_jars()
            self._write_config()
            cluster_id = self._format_storage_once(java, libs)
            process = self._launch(java, libs)
            self._wait_ready(process, timeout_s)
        logger.info(
            "Kafka broker started version=%s bootstrap=%s pid=%d cluster_id=%s duration_s=%.1f",
            self.version,
            self.bootstrap,
            process.pid,
            cluster_id,
            time.monotonic() - started,
        )
        return self.status()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the broker with SIGTERM, and with SIGKILL after ``timeout_s`` seconds.

        A stopped broker is left as it is, and a stale pid file is removed.
        """
        with _file_lock(self._lock_path()):
            record = self._live_pid_record()
            if record is None:
                self.pid_file.unlink(missing_ok=True)
                logger.debug("Kafka broker already stopped home=%s", self.home)
                return
            pid = record.pid
            started = time.monotonic()
            logger.info("stopping Kafka broker pid=%d bootstrap=%s", pid, record.bootstrap)
            self._terminate(pid, timeout_s)
            self.pid_file.unlink(missing_ok=True)
        logger.info("Kafka broker stopped pid=%d duration_s=%.1f", pid, time.monotonic() - started)

    def _lock_path(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home / ".lock"

    def _already_running(self, current: BrokerStatus) -> BrokerStatus:
        if current.bootstrap != self.bootstrap:
            raise BrokerError(
                f"the broker in {self.home} already runs on {current.bootstrap} "
                f"(pid {current.pid}), not on {self.bootstrap}; stop it with "
                f"`sec-online broker stop` before changing SEC_BROKER_PORT"
            )
        logger.info(
            "Kafka broker already running version=%s bootstrap=%s pid=%s",
            current.version,
            current.bootstrap,
            current.pid,
        )
        return current

    # Configuration and storage.
    def _write_config(self) -> None:
        self.properties_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        properties = _server_properties(
            self.settings.broker_port, self.settings.controller_port, self.data_dir
        )
        self.properties_file.write_text(properties, encoding="utf-8")
        self.log4j_file.write_text(_log4j_properties(self.log_file), encoding="utf-8")

    def _format_storage_once(self, java: str, libs: Path) -> str:
        """Format ``data_dir`` with a new cluster id unless it is formatted already."""
        existing = _read_cluster_id(self.data_dir)
        if existing is not None:
            return existing
        output = self._run_tool(java, libs, ["random-uuid"])
        cluster_id = output.strip().splitlines()[-1].strip()
        self._run_tool(java, libs, ["format", "-t", cluster_id, "-c", str(self.properties_file)])
        logger.info("formatted broker storage cluster_id=%s data_dir=%s", cluster_id, self.data_dir)
        return cluster_id

    def _run_tool(self, java: str, libs: Path, arguments: list[str]) -> str:
        command = [
            java,
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            "-cp",
            f"{libs}/*",
            STORAGE_TOOL_CLASS,
            *arguments,
        ]
        result = _run(command, cwd=self.home, timeout_s=TOOL_TIMEOUT_S, what="Kafka StorageTool")
        if result.returncode != 0:
            raise BrokerError(
                f"Kafka StorageTool {arguments[0]} failed (exit code {result.returncode}) "
                f"for data folder {self.data_dir}. Output ends with:\n{_tail_text(result.stdout)}"
            )
        return result.stdout

    # Process.
    def _launch(self, java: str, libs: Path) -> subprocess.Popen[bytes]:
        command = [
            java,
            JVM_HEAP,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            f"-Dkafka.logs.dir={self.log_file.parent}",
            "-cp",
            f"{libs}/*",
            BROKER_MAIN_CLASS,
            str(self.properties_file),
        ]
        logger.info(
            "starting Kafka broker version=%s bootstrap=%s data_dir=%s log_file=%s",
            self.version,
            self.bootstrap,
            self.data_dir,
            self.log_file,
        )
        # Error messages quote only what this start adds to the log, not older runs.
        self._log_offset = _file_size(self.log_file)
        with open(self.console_file, "wb") as console:
            # A new session keeps the broker running after the starting command exits and
            # out of reach of the terminal's Ctrl-C.
            process = subprocess.Popen(
                command,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._process = process
        record = _PidRecord(process.pid, self.bootstrap, self.version)
        _write_json_atomic(self.pid_file, dataclasses.asdict(record))
        return process

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        """Poll until the broker responds to a metadata request or its process exits.

        The metadata request waits for an open port, because kafka-python logs an error for
        every refused connection and the JVM takes seconds to open its listener.
        """
        deadline = time.monotonic() + timeout_s
        last_error: object = "port not open yet"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(
                    f"Kafka broker exited during startup with code {process.returncode}.\n"
                    f"{self._log_tails()}"
                )
            if _port_accepts(self.settings.broker_port):
                try:
                    if describe_cluster(self.bootstrap, timeout_s=1.0)["brokers"]:
                        return
                    last_error = "no broker registered yet"
                except BrokerUnavailable as exc:
                    last_error = exc
            time.sleep(0.2)
        self._terminate(process.pid, 10.0)
        self.pid_file.unlink(missing_ok=True)
        raise BrokerError(
            f"Kafka broker did not respond on {self.bootstrap} within {timeout_s:g} s "
            f"(last error: {last_error}); it was stopped. Raise the start timeout on a slow "
            f"machine.\n{self._log_tails()}"
        )

    def _terminate(self, pid: int, timeout_s: float) -> None:
        _signal(pid, signal.SIGTERM)
        if self._wait_exit(pid, timeout_s):
            return
        logger.warning(
            "Kafka broker pid=%d still running %.0f s after SIGTERM, sending SIGKILL",
            pid,
            timeout_s,
        )
        _signal(pid, signal.SIGKILL)
        if not self._wait_exit(pid, 10.0):
            raise BrokerError(f"Kafka broker pid={pid} is still alive after SIGKILL")

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        # Waiting on our own child reaps it. A broker started by another process can only be polled.
        if self._process is not None and self._process.pid == pid:
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _live_pid_record(self) -> _PidRecord | None:
        """Return the pid file's record if its process is this folder's running broker."""
        try:
            raw = json.loads(self.pid_file.read_text(encoding="utf-8"))
            record = _PidRecord(int(raw["pid"]), str(raw["bootstrap"]), str(raw["version"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable pid file %s: %s", self.pid_file, exc)
            return None
        if not _pid_alive(record.pid) or not _is_broker_process(record.pid, self.properties_file):
            return None
        return record

    def _log_tails(self) -> str:
        """Return the last lines that this start added to the broker log and the console file."""
        server = _tail_file(self.log_file, self._log_offset)
        console = _tail_file(self.console_file, 0)
        return (
            f"--- last lines of {self.log_file} ---\n{server}\n"
            f"--- last lines of {self.console_file} ---\n{console}"
        )


# Configuration files.
def _pom_xml(kafka_version: str, log4j_version: str) -> str:
    dependencies = [
        ("org.apache.kafka", "kafka_2.13", kafka_version),
        ("org.apache.logging.log4j", "log4j-slf4j2-impl", log4j_version),
        ("org.slf4j", "slf4j-api", SLF4J_VERSION),
    ]
    rows = "\n".join(
        f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{version}</version></dependency>"
        for group, artifact, version in dependencies
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>sec-online</groupId>\n"
        "  <artifactId>managed-kafka-broker</artifactId>\n"
        f"  <version>{kafka_version}</version>\n"
        "  <packaging>pom</packaging>\n"
        f"  <dependencies>\n{rows}\n  </dependencies>\n"
        "</project>\n"
    )


def _server_properties(broker_port: int, controller_port: int, data_dir: Path) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        # One node: every internal topic can only have one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        # Replayed KuaiRand events carry their 2022 timestamps. Time-based retention would
        # delete them within minutes, so this broker keeps records until their topic is deleted.
        "log.retention.ms": "-1",
    }
    lines = ["# Written by sec-online on every broker start; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _log4j_properties(log_file: Path) -> str:
    return f"""# Written by sec-online on every broker start; edits are overwritten.
status = warn
name = sec-online-broker
appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = {log_file}
appender.server.filePattern = {log_file}.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 50MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 5
rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


# Jar cache.
def _jars_complete(jar_dir: Path) -> bool:
    try:
        marker = json.loads((jar_dir / JARS_MARKER).read_text(encoding="utf-8"))
        jars = list(marker["jars"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    libs = jar_dir / "libs"
    return bool(jars) and all((libs / name).is_file() for name in jars)


def _bundled_log4j_version(libs: Path) -> str | None:
    for jar in libs.glob("log4j-core-*.jar"):
        return jar.name.removeprefix("log4j-core-").removesuffix(".jar")
    return None


def _check_jar_set(libs: Path, kafka_version: str) -> list[str]:
    jars = sorted(path.name for path in libs.glob("*.jar"))
    required = [f"kafka_2.13-{kafka_version}.jar", "log4j-slf4j2-impl-", "slf4j-api-"]
    missing = [name for name in required if not any(jar.startswith(name) for jar in jars)]
    if missing:
        raise BrokerError(
            f"Maven finished, but {libs} lacks {', '.join(missing)}; delete "
            f"{libs.parent} and start again"
        )
    return jars


# Processes and ports.
def _require_tool(name: str, fix: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BrokerError(f"`{name}` not found on PATH; {fix}")
    return path


def _require_java() -> str:
    """Return the ``java`` executable, from JAVA_HOME if set, after checking its version."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    if candidate is not None and os.access(candidate, os.X_OK):
        java = str(candidate)
    else:
        java = _require_tool("java", f"install a Java {MIN_JAVA_MAJOR}+ runtime or set JAVA_HOME")
    result = _run([java, "-version"], cwd=None, timeout_s=TOOL_TIMEOUT_S, what="java -version")
    major = _java_major(result.stdout)
    if major is None or major < MIN_JAVA_MAJOR:
        raise BrokerError(
            f"Kafka needs Java {MIN_JAVA_MAJOR} or newer, but {java} reports "
            f"{result.stdout.strip().splitlines()[:1]}; install a newer Java or set JAVA_HOME"
        )
    return java


def _java_major(version_output: str) -> int | None:
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    # Java 8 and older report "1.8.0_x".
    return int(match.group(2) or 0) if major == 1 else major


def _run(
    command: list[str], cwd: Path | None, timeout_s: float, what: str
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        raise BrokerError(
            f"{what} timed out after {timeout_s:.0f} s. Output ends with:\n{_tail_text(output)}"
        ) from exc
    except OSError as exc:
        raise BrokerError(f"{what} could not be run ({command[0]}): {exc}") from exc


def _check_ports(*ports: int) -> None:
    for port in ports:
        if not 1 <= port <= 65535:
            raise BrokerError(
                f"invalid port {port}: SEC_BROKER_PORT and SEC_CONTROLLER_PORT must be in 1..65535"
            )
    if len(set(ports)) != len(ports):
        raise BrokerError(
            f"SEC_BROKER_PORT and SEC_CONTROLLER_PORT must differ, both are {ports[0]}"
        )


def _check_port_free(port: int) -> None:
    # Kafka sets SO_REUSEADDR too, so a port whose old connections are in TIME_WAIT counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise BrokerError(f"cannot bind 127.0.0.1:{port}: {exc}") from exc
            raise BrokerError(
                f"port 127.0.0.1:{port} is already in use by another process, so the broker "
                f"cannot listen on it. Find the process with `ss -ltnp 'sport = :{port}'`, or "
                f"choose other ports with SEC_BROKER_PORT and SEC_CONTROLLER_PORT"
            ) from exc


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still accepts signals, so the state letter in /proc/<pid>/stat must not be Z.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_broker_process(pid: int, properties_file: Path) -> bool:
    """Check that ``pid`` runs Kafka with this folder's configuration and is not a reused pid."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        # NOTE: without a readable /proc (macOS) a reused pid passes as the broker.
        return True
    arguments = raw.decode(errors="replace").split("\0")
    return BROKER_MAIN_CLASS in arguments and str(properties_file) in arguments


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


# Files.
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, value: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def _read_cluster_id(data_dir: Path) -> str | None:
    try:
        text = (data_dir / "meta.properties").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    return None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tail_file(path: Path, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last lines after byte ``offset``, or of the whole file if it has shrunk."""
    try:
        with open(path, "rb") as handle:
            if offset <= _file_size(path):
                handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no such file)"
    return _tail_text(text, lines)


def _tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    kept = _ANSI_ESCAPE.sub("", text).rstrip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no output)"
