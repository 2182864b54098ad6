"""xagent-bootstrap waits for a PostgreSQL that is not reachable *yet* (boot order), and fails
at once on errors that waiting cannot fix.

The "starts later" test runs its own throwaway PostgreSQL cluster on a free loopback port
(initdb into a temp directory, as the postgres user when run as root); the shared server on
5432 is never stopped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from conftest import BIN, TEST_DB_URL, Proc, base_env, run_bootstrap, sql
from xagent import pgwait


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found and Path(found).resolve().with_name("postgres").exists():
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=len)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThrowawayPostgres:
    """A PostgreSQL cluster of this test only: superuser ``xagent``, trust auth, loopback."""

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="xagent-pg-"))
        self.data = self.root / "data"
        self.user = "postgres" if os.geteuid() == 0 else None  # postgres refuses to run as root
        if self.user:
            shutil.chown(self.root, self.user, self.user)
        self.proc: subprocess.Popen[bytes] | None = None
        # more postgresql.conf settings for start() (test_tls: ssl)
        self.extra_settings: dict[str, str] = {}

    def init(self) -> None:
        argv = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "xagent"]
        argv += ["--auth=trust", "-N", "-E", "UTF8", "--locale=C"]  # -N: no fsync, throwaway
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            user=self.user,
        )

    def start(self) -> None:
        log = (self.root / "server.log").open("wb")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.data),
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "20",
            **self.extra_settings,
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, user=self.user, start_new_session=True
        )
        log.close()

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT: fast shutdown; SIGQUIT (immediate) only if that hangs
            for sig, wait in [(signal.SIGINT, 30), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(wait)
                    break
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    pg = ThrowawayPostgres(bindir, _free_port())
    try:
        yield pg
    finally:
        pg.stop()


def test_bootstrap_waits_for_postgresql_that_starts_later(
    throwaway_pg: ThrowawayPostgres, tmp_path: Path
) -> None:
    pg = throwaway_pg
    pg.init()  # before the bootstrap starts: the server itself starts ~4 s after it
    db_url = f"postgresql+asyncpg://xagent@127.0.0.1:{pg.port}/postgres"
    env = base_env(db_url, "q", tmp_path / "models", XAGENT_BOOTSTRAP_WAIT_SECONDS="120")
    proc = Proc("bootstrap", [str(BIN / "xagent-bootstrap"), "all"], env, tmp_path)
    try:
        # attempts at 0, 1, 3 s (backoff 1, 2, 4, ...): nothing listens yet
        proc.wait_for_log(r"waiting for postgresql: \S+.*\(attempt 3, \d+ s elapsed\)", 60)
        pg.start()
        assert proc.popen.wait(90) == 0, proc.log() + pg.log()
    finally:
        proc.stop()
    out = proc.log()
    assert "waiting for postgresql: ConnectionRefusedError: " in out
    assert "(attempt 1, 0 s elapsed)" in out
    assert "postgresql reachable after " in out
    assert "migrate: schema upgraded None -> " in out
    runs = sql(db_url, "SELECT steps, ok FROM bootstrap_runs")
    assert [(r["steps"], r["ok"]) for r in runs] == [("migrate,models,tools,root-user", True)]
    assert sql(db_url, "SELECT count(*) AS n FROM users")[0]["n"] == 1


def test_bootstrap_gives_up_at_the_deadline(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    db_url = f"postgresql+asyncpg://xagent:xagent@127.0.0.1:{port}/xagent"
    env = base_env(db_url, "q", tmp_path / "models", XAGENT_BOOTSTRAP_WAIT_SECONDS="3")
    started = time.monotonic()
    result = run_bootstrap(env, "all")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("xagent-bootstrap: error: migrate: postgresql not reachable after ")
    assert "(deadline XAGENT_BOOTSTRAP_WAIT_SECONDS=3)" in line
    assert "last error: ConnectionRefusedError" in line
    assert elapsed >= 3
    # attempts at 0, 1 and 3 s: one line for each but the last, which is at the deadline
    # (not a whole backoff after it) and ends in the error
    attempts = [ln for ln in result.stdout.splitlines() if ln.startswith("waiting for postgresql")]
    numbers = [int(ln.split("(attempt ")[1].split(",")[0]) for ln in attempts]
    assert numbers == list(range(1, len(numbers) + 1)), attempts
    assert f"and {len(numbers) + 1} attempt(s)" in line
    # as measured by the bootstrap itself: a further backoff would have ended at 7 s
    waited = re.search(r"not reachable after (\d+) s", line)
    assert waited is not None
    assert 3 <= int(waited.group(1)) < 7, line


@pytest.mark.parametrize(
    ("password", "database", "expected"),
    [
        ("wrong", None, "password authentication failed"),
        (None, "xagent_no_such_db", 'database "xagent_no_such_db" does not exist'),
    ],
)
def test_errors_that_waiting_cannot_fix_fail_at_once(
    services: None, tmp_path: Path, password: str | None, database: str | None, expected: str
) -> None:
    url = make_url(TEST_DB_URL)
    url = url.set(password=password or url.password, database=database or url.database)
    db_url = url.render_as_string(hide_password=False)
    env = base_env(db_url, "q", tmp_path / "models", XAGENT_BOOTSTRAP_WAIT_SECONDS="900")
    result = run_bootstrap(env, "migrate", timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("xagent-bootstrap: error: migrate: cannot use postgresql: ")
    assert expected in line
    assert "waiting for postgresql" not in result.stdout


def _wrapped(exc: Exception) -> DBAPIError:
    """How SQLAlchemy hands asyncpg's errors to the bootstrap."""
    return DBAPIError(None, None, exc)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "reset by peer"),
        socket.gaierror(-3, "Temporary failure in name resolution"),
        TimeoutError(),
        _wrapped(asyncpg.CannotConnectNowError("the database system is starting up")),
        _wrapped(asyncpg.CannotConnectNowError("the database system is shutting down")),
        _wrapped(asyncpg.TooManyConnectionsError("sorry, too many clients already")),
        _wrapped(asyncpg.AdminShutdownError("terminating connection")),
        _wrapped(asyncpg.ConnectionDoesNotExistError("connection was closed")),
    ],
    ids=repr,
)
def test_retryable_errors(exc: Exception) -> None:
    assert pgwait.is_retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        _wrapped(asyncpg.InvalidPasswordError("password authentication failed")),
        _wrapped(asyncpg.InvalidCatalogNameError('database "x" does not exist')),
        _wrapped(asyncpg.InvalidAuthorizationSpecificationError("no pg_hba.conf entry")),
        _wrapped(asyncpg.UndefinedTableError('relation "x" does not exist')),
        ValueError("bug"),
    ],
    ids=repr,
)
def test_errors_that_are_not_retried(exc: Exception) -> None:
    assert not pgwait.is_retryable(exc)


def test_describe_names_the_driver_error() -> None:
    exc = _wrapped(asyncpg.CannotConnectNowError("the database system is starting up"))
    assert pgwait.describe(exc) == "CannotConnectNowError: the database system is starting up"
    assert pgwait.describe(TimeoutError()) == "TimeoutError: connection attempt timed out"


def test_wait_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from xagent.settings import SettingsError, load_settings

    base = {"database_url": "postgresql://x@127.0.0.1/x", "redis_url": "redis://127.0.0.1/0"}
    monkeypatch.delenv("XAGENT_BOOTSTRAP_WAIT_SECONDS", raising=False)
    assert load_settings(**base).bootstrap_wait_seconds == 900
    monkeypatch.setenv("XAGENT_BOOTSTRAP_WAIT_SECONDS", "0")
    assert load_settings(**base).bootstrap_wait_seconds == 0
    monkeypatch.setenv("XAGENT_BOOTSTRAP_WAIT_SECONDS", "-1")
    with pytest.raises(SettingsError, match=r"^XAGENT_BOOTSTRAP_WAIT_SECONDS: "):
        load_settings(**base)
