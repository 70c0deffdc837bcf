"""A real, throwaway PostgreSQL server for the tests, started by the test suite itself.

The server binaries come from the `pgserver` wheel (PostgreSQL 16, built for manylinux), so
`pip install -e '.[test]'` is all a fresh machine needs: no system package, no download at run
time. Only the binaries are used, not pgserver's own start-up (which listens on a Unix socket
only and changes permissions of folders above its data directory): this module runs `initdb`
and `postgres` itself, listening on a free loopback port with password authentication.

PostgreSQL refuses to run as root. Under root (CI and these machines) the server runs as the
unprivileged `nobody` account: its data directory is a fresh temporary folder owned by that
account, and if the binaries are not reachable for it (a checkout below a private folder) they
are copied next to the data directory first.

Use it from a test module with

    postgres_server = postgres_server_fixture()

which defines a session-scoped fixture yielding a `PostgresServer`; the server is stopped and
its files removed when the session ends. Start-up takes about 2 s.
"""

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import psycopg2
import pytest

UNPRIVILEGED_USER = "nobody"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0

# Settings for a disposable test server: nothing needs to survive a crash, and dates that
# the views derive from timestamps are UTC days.
SERVER_SETTINGS: Dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "timezone": "UTC",
    "max_connections": "40",
}


@dataclass(frozen=True)
class PostgresServer:
    """Where a running test server listens and how to log in."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def dsn(self, database: Optional[str] = None) -> str:
        """A `postgresql://` URL, as dlt's postgres destination takes it."""
        name = database or self.database
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{name}"

    def connect(self, database: Optional[str] = None) -> Any:
        """A new autocommit psycopg2 connection."""
        connection = psycopg2.connect(self.dsn(database))
        connection.autocommit = True
        return connection


def postgres_binaries() -> Path:
    """The `bin` folder of the PostgreSQL build that the `pgserver` wheel ships.

    Found without importing pgserver, whose import creates runtime folders and lock files.
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pgserver is not installed: pip install -e '.[test]'")
    binaries = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (binaries / "postgres").is_file():
        raise RuntimeError(f"pgserver ships no postgres binary at {binaries}")
    return binaries


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Runner:
    """Runs PostgreSQL programs as the current user, or as `nobody` when that is root."""

    def __init__(self) -> None:
        self.account: Optional[pwd.struct_passwd] = None
        if os.geteuid() == 0:
            try:
                self.account = pwd.getpwnam(UNPRIVILEGED_USER)
            except KeyError:
                raise RuntimeError(
                    f"PostgreSQL refuses to run as root and there is no {UNPRIVILEGED_USER!r} "
                    "account to run it as; run the tests as another user"
                ) from None
        # initdb takes the locale from the environment; C is always there.
        self.env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        self.env.pop("PGDATA", None)

    def _as_user(self) -> Dict[str, Any]:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def own(self, path: Path) -> None:
        """Give a folder to the account the server runs as."""
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def run(self, command: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            command,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **self._as_user(),
        )

    def start(self, command: List[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as output:
            return subprocess.Popen(
                command,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **self._as_user(),
            )


def _usable_binaries(runner: _Runner, workdir: Path) -> Path:
    """The binaries, copied into `workdir` if the server's account cannot run them in place."""
    binaries = postgres_binaries()
    try:
        if runner.run([str(binaries / "postgres"), "--version"]).returncode == 0:
            return binaries
    except PermissionError:
        pass
    # The wheel's programs find their shared libraries at $ORIGIN/../../../pgserver.libs:
    # keep that layout.
    package = binaries.parent.parent
    shutil.copytree(package / "pginstall", workdir / "pgserver" / "pginstall", symlinks=True)
    libraries = package.parent / "pgserver.libs"
    if libraries.is_dir():
        shutil.copytree(libraries, workdir / "pgserver.libs", symlinks=True)
    return workdir / "pgserver" / "pginstall" / "bin"


def _wait_until_ready(server: PostgresServer, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with {process.returncode}:\n{log.read_text()}")
        try:
            server.connect().close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept connections in {START_TIMEOUT_S} s:\n"
                    + log.read_text()
                ) from None
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT) of the server process this module started; kill it if stuck."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)


@contextmanager
def running_postgres(attempts: int = 3) -> Iterator[PostgresServer]:
    """Create a cluster in a temporary folder, serve it on 127.0.0.1, remove it afterwards."""
    runner = _Runner()
    workdir = Path(tempfile.mkdtemp(prefix="klaviyo-postgres-"))
    os.chmod(workdir, 0o711)  # the server's account goes through it to its data directory
    try:
        binaries = _usable_binaries(runner, workdir)
        data = workdir / "data"
        data.mkdir(mode=0o700)
        runner.own(data)
        password = secrets.token_hex(12)
        password_file = workdir / "password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        runner.own(password_file)  # initdb reads it as the server's account
        initdb = runner.run(
            [
                str(binaries / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                "loader",
                "--pwfile",
                str(password_file),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        password_file.unlink()
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        settings = [
            arg for name, value in SERVER_SETTINGS.items() for arg in ("-c", f"{name}={value}")
        ]
        log = workdir / "postgres.log"
        for attempt in range(attempts):
            server = PostgresServer(
                "127.0.0.1", _free_loopback_port(), "loader", password, "postgres"
            )
            command = [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-h",
                server.host,
                "-p",
                str(server.port),
                "-k",
                "",  # no Unix socket: loopback TCP only
                *settings,
            ]
            process = runner.start(command, log)
            try:
                _wait_until_ready(server, process, log)
            except RuntimeError:
                _stop(process)
                if attempt + 1 == attempts:
                    raise
                continue  # most likely the port was taken in between: try another one
            try:
                yield server
            finally:
                _stop(process)
            return
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def postgres_server_fixture(name: str = "postgres_server") -> Callable[..., Any]:
    """A session-scoped pytest fixture, called `name`, yielding a running `PostgresServer`."""

    @pytest.fixture(scope="session", name=name)
    def _postgres_server() -> Iterator[PostgresServer]:
        with running_postgres() as server:
            yield server

    return _postgres_server
