"""Fixtures: a scratch PostgreSQL database per session (and per bootstrap test), unique Redis
stream names per test, and helpers that run the real CLIs (taskiq worker/scheduler,
gunicorn, xagent-bootstrap) as subprocesses on 127.0.0.1.

Services come from ``bash tests/services.sh``; override with ``XAGENT_TEST_DATABASE_URL`` and
``XAGENT_TEST_REDIS_URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

DEFAULT_DB = "postgresql+asyncpg://xagent:xagent@127.0.0.1:5432/xagent_test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
BIN = Path(sys.executable).parent

TEST_DB_URL = os.environ.get("XAGENT_TEST_DATABASE_URL", DEFAULT_DB)
TEST_REDIS_URL = os.environ.get("XAGENT_TEST_REDIS_URL", DEFAULT_REDIS)
# for requests that commit to PostgreSQL (POST /runs): a commit waits for fsync, which takes
# seconds on a machine that is busy writing (CI builds images beside the tests); httpx's
# default of 5 s is then a flaky failure, not a finding
HTTP_TIMEOUT = 30.0


def _dsn(sqlalchemy_url: str, database: str | None = None) -> str:
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def sql(db_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query against ``db_url`` (a SQLAlchemy URL) and return the rows."""

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(_dsn(db_url))
        try:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows
        finally:
            await conn.close()

    return asyncio.run(go())


def create_database() -> str:
    """A fresh, empty database; returns its SQLAlchemy URL."""
    name = f"xagent_t_{uuid.uuid4().hex[:12]}"
    sql(TEST_DB_URL, f'CREATE DATABASE "{name}"')
    return make_url(TEST_DB_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(db_url: str) -> None:
    name = make_url(db_url).database
    sql(TEST_DB_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def base_env(db_url: str, queue: str, models_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XAGENT_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(models_dir.parent / "prometheus"),
            "XAGENT_DATABASE_URL": db_url,
            "XAGENT_REDIS_URL": TEST_REDIS_URL,
            "XAGENT_MODELS_DIR": str(models_dir),
            "XAGENT_MODELS": "[]",
            "XAGENT_QUEUE_NAME": queue,
            "XAGENT_ROOT_PASSWORD": "correct horse battery",
            "XAGENT_TICK_CRON": "",
            "XAGENT_HOST_NAME": "testhost",
        }
    )
    env.update(extra)
    return env


def run_bootstrap(
    env: dict[str, str], *steps: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "xagent-bootstrap"), *steps],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Proc:
    """A CLI started in its own session (so the whole process group can be signalled)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_dir: Path,
        preexec_fn: Callable[[], Any] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no {pattern!r} in log:\n{self.log()[-4000:]}")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # hung: faulthandler (PYTHONFAULTHANDLER) writes every thread's stack to the
                # log on SIGABRT, so the failure shows where it hung
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(2)
        # whatever is left of the group (children) is killed
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


class Stack:
    """Starts the app's processes for one test (or module) and stops them afterwards."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.base_url = ""

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], Any] | None = None,
    ) -> Proc:
        proc = Proc(name, argv, env or self.env, self.log_dir, preexec_fn)
        self.procs.append(proc)
        return proc

    def web(self, workers: int = 1, env: dict[str, str] | None = None) -> str:
        proc = self.start(
            "web",
            [
                str(BIN / "gunicorn"),
                "-k",
                "uvicorn_worker.UvicornWorker",
                "--bind",
                "127.0.0.1:0",
                "--workers",
                str(workers),
                "--no-control-socket",
                "--graceful-timeout",
                "5",
                "xagent.main:app",
            ],
            env,
        )
        port = proc.wait_for_log(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"web never answered:\n{proc.log()[-4000:]}")
        if not self.base_url:
            self.base_url = base_url
        return base_url

    def receiver(
        self,
        workers: int = 1,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        proc = self.start(
            "receiver",
            [
                str(BIN / "taskiq"),
                "worker",
                "xagent.broker:broker",
                "xagent.tasks",
                "--workers",
                str(workers),
                *extra,
            ],
            env,
        )
        if wait:
            wait_for_receiver(proc, workers)
        return proc

    def scheduler(
        self,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        preexec_fn: Callable[[], Any] | None = None,
    ) -> Proc:
        proc = self.start(
            "scheduler",
            [
                str(BIN / "taskiq"),
                "scheduler",
                "xagent.scheduler:scheduler",
                "xagent.tasks",
                *extra,
            ],
            env,
            preexec_fn,
        )
        if wait:
            proc.wait_for_log(r"Startup completed", timeout=30)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(signal.SIGINT if proc.name == "scheduler" else signal.SIGTERM)


def check(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``xagent-check ARGS`` with the stack's settings."""
    return subprocess.run(
        [str(BIN / "xagent-check"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A private, empty redis-server on 127.0.0.1 (tests that stop and start Redis)."""

    def __init__(self, port: int, log_dir: Path) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.log_dir = log_dir
        self.proc: Proc | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed")
        argv = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.log_dir)]
        self.proc = Proc("redis", argv, dict(os.environ), self.log_dir)
        self.proc.wait_for_log(r"Ready to accept connections", timeout=20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGKILL)
            self.proc = None


def wait_for_receiver(proc: Proc, workers: int, timeout: float = 40) -> None:
    """Wait until every child of a ``taskiq worker`` is listening."""
    wait_until(
        lambda: proc.log().count("Listening started") >= workers or proc.popen.poll() is not None,
        timeout=timeout,
        what=f"{proc.name} to listen",
    )
    assert proc.popen.poll() is None, proc.log()[-4000:]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def services() -> None:
    """Fail early with a clear message when PostgreSQL or Redis are not there."""
    try:
        sql(TEST_DB_URL, "SELECT 1")
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {TEST_DB_URL} not reachable ({exc}); run tests/services.sh")
    try:
        redis.Redis.from_url(TEST_REDIS_URL).ping()
    except Exception as exc:
        pytest.fail(f"Redis at {TEST_REDIS_URL} not reachable ({exc}); run tests/services.sh")


@pytest.fixture(scope="session")
def session_db(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database with the tools registered, shared by the session."""
    db_url = create_database()
    env = base_env(db_url, "unused", tmp_path_factory.mktemp("models"))
    result = run_bootstrap(env, "migrate", "tools")
    assert result.returncode == 0, result.stderr
    yield db_url
    drop_database(db_url)


@pytest.fixture
def fresh_db(services: None) -> Iterator[str]:
    """An empty database for one test."""
    db_url = create_database()
    yield db_url
    drop_database(db_url)


@pytest.fixture
def queue_name(services: None) -> Iterator[str]:
    """A unique stream name; its keys are deleted afterwards."""
    name = f"xt-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(TEST_REDIS_URL)
    keys = list(client.scan_iter(f"{name}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis (not started yet: ``.start()``); stopped afterwards."""
    server = RedisServer(free_port(), tmp_path)
    yield server
    server.stop()


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Stack]]:
    stacks: list[Stack] = []

    def make(env: dict[str, str]) -> Stack:
        stack = Stack(env, tmp_path)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop_all()


# -- measurements a test reports (printed at the end of the run, not asserted on) ------------

_REPORTS: list[str] = []


@pytest.fixture
def report_line() -> Callable[[str], None]:
    return _REPORTS.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORTS:
        terminalreporter.section("measurements")
        for line in _REPORTS:
            terminalreporter.write_line(line)
