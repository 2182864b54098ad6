"""Migrations keep the serving release answering (issue 20 item 6): each revision gives up
on its lock after ``XAGENT_MIGRATE_LOCK_TIMEOUT_MS`` and is retried, instead of queueing
every query on the table behind it; indexes are built concurrently (``xagent.ddl``), and a
build that failed half-way is rebuilt by the next run. Proven on a ``runs`` table of one
million rows with ``POST /runs`` answered throughout."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx

from conftest import BIN, HTTP_TIMEOUT, Stack, _dsn, base_env, run_bootstrap, sql
from test_schema import NEWER, newer_release

ROWS = 1_000_000
ADD_AND_INDEX = (
    "from xagent.ddl import create_index_concurrently\n"
    '    op.add_column("runs", sa.Column("note_{rev}", sa.Text, nullable=True))\n'
    '    create_index_concurrently("runs_created_{rev}_idx", "runs", ["created_at"])'
)
UNIQUE_STATUS = (
    "from xagent.ddl import create_index_concurrently\n"
    '    create_index_concurrently("runs_status_{rev}_key", "runs", ["status"], unique=True)'
)


def _migrate_newer(env: dict[str, str], location: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "python"), "-c", NEWER, location, "migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Migration:
    """``xagent-bootstrap migrate`` of a newer release, its output read as it comes (a test
    waits for a line instead of guessing how long a loaded machine takes to get there)."""

    def __init__(self, env: dict[str, str], location: str) -> None:
        self.proc = _migrate_newer(env, location)
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 300) -> bool:
        """Whether a line containing ``text`` came (False: the command ended without it);
        the timeout is a deadline for a hang, not a speed bound."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._eof or any(text in line for line in self.lines), timeout
            )
            return any(text in line for line in self.lines)

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc, "".join(self.lines), err


def _index_valid(db_url: str, name: str) -> bool | None:
    rows = sql(
        db_url,
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = $1",
        name,
    )
    return bool(rows[0]["indisvalid"]) if rows else None


class LockHolder:
    """A session that holds ACCESS SHARE on ``runs`` (a long report query, a slow
    transaction) until :meth:`release`."""

    def __init__(self, db_url: str) -> None:
        self._db_url = db_url
        self._release = threading.Event()
        self._holding = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        conn = await asyncpg.connect(_dsn(self._db_url))
        try:
            async with conn.transaction():
                await conn.fetch("SELECT 1 FROM runs LIMIT 1")
                self._holding.set()
                while not self._release.is_set():
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def __enter__(self) -> LockHolder:
        self._thread.start()
        assert self._holding.wait(30), "the lock holder never got its lock"
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_a_blocked_revision_gives_up_and_retries_while_queries_go_on(
    fresh_db: str, tmp_path: Path
) -> None:
    env = base_env(fresh_db, "unused", tmp_path / "models", XAGENT_MIGRATE_LOCK_TIMEOUT_MS="200")
    assert run_bootstrap(env, "migrate").returncode == 0
    location = newer_release(
        tmp_path, ("9001", True, 'op.add_column("runs", sa.Column("note", sa.Text))')
    )
    with LockHolder(fresh_db) as holder:
        migrate = Migration(env, location)
        try:
            # the ALTER cannot get ACCESS EXCLUSIVE while the holder reads: without
            # lock_timeout it would wait in the lock queue (and never say this), and every
            # later reader behind it
            gave_up = "migrate: the revision after 0005 gave up waiting 200 ms for a lock"
            assert migrate.wait_for(gave_up), migrate.lines
            # while it retries, readers of the table get through (they would fail after
            # 5 s of waiting behind a queued ALTER instead of hanging the test)
            for _ in range(10):
                rows = sql(
                    fresh_db,
                    "SELECT count(*) AS n FROM runs, (SELECT set_config('lock_timeout', "
                    "'5s', true)) AS s",
                )
                assert rows[0]["n"] == 0
                time.sleep(0.2)
            assert migrate.proc.poll() is None, migrate.lines
        finally:
            holder.release()
        rc, out, err = migrate.finish()
    assert rc == 0, out + err
    assert "schema upgraded 0005 -> 9001" in out, out
    assert sql(fresh_db, "SELECT version_num FROM alembic_version")[0]["version_num"] == "9001"


def test_a_revision_that_never_gets_its_lock_fails_with_the_cause(
    fresh_db: str, tmp_path: Path
) -> None:
    env = base_env(
        fresh_db,
        "unused",
        tmp_path / "models",
        XAGENT_MIGRATE_LOCK_TIMEOUT_MS="100",
        XAGENT_MIGRATE_LOCK_RETRIES="2",
    )
    assert run_bootstrap(env, "migrate").returncode == 0
    location = newer_release(
        tmp_path, ("9001", True, 'op.add_column("runs", sa.Column("note", sa.Text))')
    )
    with LockHolder(fresh_db):
        migrate = _migrate_newer(env, location)
        out, err = migrate.communicate(timeout=120)
    assert migrate.returncode == 1, out + err
    assert err.strip().splitlines()[-1] == (
        "xagent-bootstrap: error: migrate: the revision after 0005 did not get its lock within "
        "100 ms in 3 tries (XAGENT_MIGRATE_LOCK_TIMEOUT_MS, XAGENT_MIGRATE_LOCK_RETRIES): a "
        "long transaction holds the table (see pg_stat_activity)"
    )
    # nothing of it applied; the next run applies it
    assert sql(fresh_db, "SELECT version_num FROM alembic_version")[0]["version_num"] == "0005"
    rerun = _migrate_newer(env, location)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, out + err


def test_a_failed_concurrent_index_build_is_rebuilt_by_the_next_run(
    fresh_db: str, tmp_path: Path
) -> None:
    env = base_env(fresh_db, "unused", tmp_path / "models")
    assert run_bootstrap(env, "migrate").returncode == 0
    two = "INSERT INTO runs (id, status, input) SELECT gen_random_uuid(), 'done', '1' FROM "
    sql(fresh_db, two + "generate_series(1, 2)")
    location = newer_release(tmp_path, ("9001", True, UNIQUE_STATUS))
    first = _migrate_newer(env, location)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 1, out + err
    assert "could not create unique index" in err, err
    # what a failed CREATE INDEX CONCURRENTLY leaves behind
    assert _index_valid(fresh_db, "runs_status_9001_key") is False
    sql(fresh_db, "DELETE FROM runs")
    second = _migrate_newer(env, location)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, out + err
    assert _index_valid(fresh_db, "runs_status_9001_key") is True


class Probe:
    """``POST /runs`` in a loop from a few threads; each request's start, latency, outcome."""

    def __init__(self, base_url: str, threads: int = 4) -> None:
        self.base_url = base_url
        self.samples: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    resp = client.post(
                        f"{self.base_url}/runs", json={"tool": "echo", "args": {"text": "p"}}
                    )
                    outcome = str(resp.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.samples.append((start, time.monotonic() - start, outcome))

    def __enter__(self) -> Probe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HTTP_TIMEOUT + 5)


def _commands_seen(db_url: str, seen: set[str], stop: threading.Event) -> None:
    async def watch() -> None:
        conn = await asyncpg.connect(_dsn(db_url))
        try:
            while not stop.is_set():
                for row in await conn.fetch("SELECT command FROM pg_stat_progress_create_index"):
                    seen.add(str(row["command"]))
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    asyncio.run(watch())


def test_a_million_runs_migrate_under_load(
    fresh_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
    report_line: Callable[[str], None],
) -> None:
    env = base_env(fresh_db, queue_name, tmp_path / "models")
    assert run_bootstrap(env, "migrate", "tools").returncode == 0
    sql(
        fresh_db,
        f"INSERT INTO runs (id, status, input, attempts, created_at, finished_at) "
        f"SELECT gen_random_uuid(), 'done', '{{\"tool\": \"echo\"}}', 1, "
        f"now() - g * interval '1 second', now() FROM generate_series(1, {ROWS}) AS g",
    )
    sql(fresh_db, "ANALYZE runs")
    base_url = stack_factory(env).web(workers=2)
    location = newer_release(tmp_path, ("9001", True, ADD_AND_INDEX))

    seen: set[str] = set()
    watching = threading.Event()
    watcher = threading.Thread(target=_commands_seen, args=(fresh_db, seen, watching))
    with Probe(base_url) as probe:
        time.sleep(2)  # a baseline before the migration starts
        began = time.monotonic()
        watcher.start()
        # a slow transaction on runs as the migration starts: the ALTER must give up and
        # retry (default lock_timeout) rather than queue the POSTs behind it
        with LockHolder(fresh_db):
            migrate = Migration(env, location)
            gave_up = migrate.wait_for("gave up waiting 2000 ms for a lock")
        rc, out, err = migrate.finish()
        ended = time.monotonic()
        watching.set()
        watcher.join(30)
        time.sleep(1)
    assert rc == 0, out + err
    assert gave_up, out
    assert "schema upgraded 0005 -> 9001" in out, out
    assert seen == {"CREATE INDEX CONCURRENTLY"}, seen
    assert _index_valid(fresh_db, "runs_created_9001_idx") is True
    assert sql(fresh_db, "SELECT count(*) AS n FROM runs")[0]["n"] >= ROWS

    failed = [s for s in probe.samples if s[2] != "202"]
    during = sorted(lat for start, lat, _ in probe.samples if began <= start <= ended)
    p99 = during[int(len(during) * 0.99) - 1] if during else float("nan")
    report = (
        f"{len(probe.samples)} POST /runs, {len(failed)} failed; during the migration "
        f"({ended - began:.1f} s): {len(during)} requests, median "
        f"{statistics.median(during) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {during[-1] * 1000:.0f} ms (the lock_timeout bounds a wait)"
    )
    report_line(f"online migration of {ROWS} runs: {report}")
    assert during, report
    assert failed == [], f"{report}; first failures: {failed[:5]}"
