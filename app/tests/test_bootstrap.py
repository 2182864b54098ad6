"""xagent-bootstrap as a subprocess: idempotence, concurrency, failures, run bookkeeping."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from conftest import BIN, Proc, base_env, run_bootstrap, sql, wait_until
from fileserver import FileServer
from xagent.bootstrap import ADVISORY_LOCK_KEY, verify_password
from xagent.tools import REGISTRY


def _rows(db_url: str, query: str) -> list[dict[str, object]]:
    return [dict(r) for r in sql(db_url, query)]


def _snapshot(db_url: str) -> dict[str, object]:
    return {
        "tools": _rows(db_url, "SELECT * FROM tools ORDER BY name"),
        "users": _rows(db_url, "SELECT * FROM users ORDER BY username"),
        "version": _rows(db_url, "SELECT * FROM alembic_version"),
    }


def _head_revision() -> str:
    """The newest migration shipped in the package (so new migrations need no test edit)."""
    from importlib.resources import files

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(files("xagent") / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def test_all_is_idempotent_and_records_each_run(fresh_db: str, tmp_path: Path) -> None:
    env = base_env(fresh_db, "q", tmp_path / "models")
    first = run_bootstrap(env)  # default: all
    assert first.returncode == 0, first.stderr
    assert f"migrate: schema upgraded None -> {_head_revision()}" in first.stdout
    snap = _snapshot(fresh_db)

    second = run_bootstrap(env, "all")
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert _snapshot(fresh_db) == snap  # byte-identical rows, updated_at included

    runs = _rows(fresh_db, "SELECT host, steps, ok, finished_at FROM bootstrap_runs ORDER BY id")
    assert [(r["host"], r["steps"], r["ok"]) for r in runs] == [
        ("testhost", "migrate,models,tools,root-user", True)
    ] * 2
    assert all(r["finished_at"] is not None for r in runs)

    tools = {r["name"]: r for r in _rows(fresh_db, "SELECT * FROM tools")}
    assert set(tools) == set(REGISTRY)
    assert all(r["active"] for r in tools.values())
    assert json.loads(str(tools["echo"]["schema"])) == REGISTRY["echo"].schema


def test_root_user_password_is_a_salted_kdf_hash(fresh_db: str, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "root_password").write_text("from the credential file\n")
    env = base_env(fresh_db, "q", tmp_path / "models", CREDENTIALS_DIRECTORY=str(creds))
    env["XAGENT_ROOT_PASSWORD"] = "ignored when the credential exists"
    assert run_bootstrap(env, "migrate", "root-user").returncode == 0
    (row,) = _rows(fresh_db, "SELECT username, password_hash, is_admin FROM users")
    assert row["username"] == "root"
    assert row["is_admin"] is True
    stored = str(row["password_hash"])
    assert stored.startswith("scrypt$")
    assert "from the credential file" not in stored
    assert verify_password("from the credential file", stored)
    assert not verify_password("ignored when the credential exists", stored)


def test_concurrent_bootstraps_serialise(fresh_db: str, tmp_path: Path) -> None:
    """Two hosts bootstrapping an empty database at once: both succeed, no duplicates."""
    env_a = base_env(fresh_db, "q", tmp_path / "a", XAGENT_HOST_NAME="host-a")
    env_b = base_env(fresh_db, "q", tmp_path / "b", XAGENT_HOST_NAME="host-b")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda e: run_bootstrap(e, "all"), [env_a, env_b]))
    for result in results:
        assert result.returncode == 0, result.stderr
    counts = _rows(fresh_db, "SELECT name, count(*) AS n FROM tools GROUP BY name")
    assert {r["name"]: r["n"] for r in counts} == dict.fromkeys(REGISTRY, 1)
    assert _rows(fresh_db, "SELECT count(*) AS n FROM users") == [{"n": 1}]
    hosts = _rows(fresh_db, "SELECT host FROM bootstrap_runs ORDER BY host")
    assert [r["host"] for r in hosts] == ["host-a", "host-b"]


async def _advisory_waiters(conn: asyncpg.Connection, database: str) -> int:
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
        "AND application_name = 'xagent' AND wait_event_type = 'Lock' "
        "AND wait_event = 'advisory'",
        database,
    )
    return int(count)


RUNS = 2  # concurrent runs per step (each is a whole interpreter: keep the CPU use small)


@pytest.mark.parametrize("step", ["tools", "root-user", "migrate"])
async def test_cluster_steps_wait_for_the_advisory_lock(
    fresh_db: str, tmp_path: Path, step: str
) -> None:
    """While someone else holds the cluster lock, concurrent runs of a cluster-wide step write
    nothing; each waits, then they run one after another. (Without the lock the runs would
    finish while the test still holds it, and this test fails.)"""
    env = base_env(fresh_db, "q", tmp_path / "models")
    assert (await asyncio.to_thread(run_bootstrap, env, "migrate")).returncode == 0
    url = make_url(fresh_db)
    holder = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
    procs: list[asyncio.subprocess.Process] = []
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        runs_before = await holder.fetchval("SELECT count(*) FROM bootstrap_runs")
        for _ in range(RUNS):
            procs.append(
                await asyncio.create_subprocess_exec(
                    str(BIN / "xagent-bootstrap"),
                    step,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        deadline = time.monotonic() + 60
        while await _advisory_waiters(holder, str(url.database)) < RUNS:
            finished = [p for p in procs if p.returncode is not None]
            assert not finished, f"a {step} run finished while the cluster lock was held"
            assert time.monotonic() < deadline, f"{step} runs never waited for the lock"
            await asyncio.sleep(0.1)
        # nothing written while the lock is held elsewhere
        assert await holder.fetchval("SELECT count(*) FROM tools") == 0
        assert await holder.fetchval("SELECT count(*) FROM users") == 0
        assert await holder.fetchval("SELECT count(*) FROM bootstrap_runs") == runs_before
        await holder.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await holder.close()
    texts = [out.decode() for out, _ in outputs]
    assert [p.returncode for p in procs] == [0] * RUNS, outputs
    assert all("waiting for the cluster bootstrap lock" in t for t in texts), texts
    if step == "tools":
        query = "SELECT name, count(*) AS n FROM tools GROUP BY name"
        rows = await asyncio.to_thread(_rows, fresh_db, query)
        assert {r["name"]: r["n"] for r in rows} == dict.fromkeys(REGISTRY, 1)
        # exactly one of them inserted the rows; the others found nothing to change
        changed = sorted(
            int(re.search(r"in code, (\d+) inserted/updated", t).group(1))  # type: ignore[union-attr]
            for t in texts
        )
        assert changed == [0] * (RUNS - 1) + [len(REGISTRY)]
    if step == "root-user":
        users = await asyncio.to_thread(_rows, fresh_db, "SELECT count(*) AS n FROM users")
        assert users == [{"n": 1}]
        assert sum("created 'root'" in t for t in texts) == 1


def test_tools_gone_from_code_are_marked_inactive(fresh_db: str, tmp_path: Path) -> None:
    env = base_env(fresh_db, "q", tmp_path / "models")
    assert run_bootstrap(env, "migrate", "tools").returncode == 0
    sql(
        fresh_db,
        "INSERT INTO tools (name, description, schema, version) "
        "VALUES ('retired', 'old tool', '{}', '0')",
    )
    sql(fresh_db, "UPDATE tools SET description = 'stale' WHERE name = 'echo'")
    result = run_bootstrap(env, "tools")
    assert result.returncode == 0, result.stderr
    assert "1 inserted/updated, 1 retired" in result.stdout
    rows = {r["name"]: r for r in _rows(fresh_db, "SELECT * FROM tools")}
    assert rows["retired"]["active"] is False  # kept, not deleted
    assert rows["echo"]["description"] == REGISTRY["echo"].description


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xagent-bootstrap: error: ")
    return lines[0]


def test_missing_setting_fails_with_its_name(tmp_path: Path) -> None:
    env = base_env("postgresql+asyncpg://x@127.0.0.1/x", "q", tmp_path)
    del env["XAGENT_DATABASE_URL"]
    line = _one_line_error(run_bootstrap(env, "all"))
    assert "XAGENT_DATABASE_URL: required setting is missing" in line


def test_malformed_models_fails_with_its_name(tmp_path: Path) -> None:
    env = base_env("postgresql+asyncpg://x@127.0.0.1/x", "q", tmp_path, XAGENT_MODELS="[{")
    line = _one_line_error(run_bootstrap(env, "models"))
    assert "XAGENT_MODELS: not valid JSON" in line


def test_unknown_step(tmp_path: Path) -> None:
    env = base_env("postgresql+asyncpg://x@127.0.0.1/x", "q", tmp_path)
    assert "unknown step 'everything'" in _one_line_error(run_bootstrap(env, "everything"))


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = base_env(
        "postgresql+asyncpg://xagent:xagent@127.0.0.1:9/none",
        "q",
        tmp_path,
        XAGENT_BOOTSTRAP_WAIT_SECONDS="0",  # a single attempt
    )
    result = run_bootstrap(env, "migrate")
    line = _one_line_error(result)
    assert line.startswith("xagent-bootstrap: error: migrate: postgresql not reachable after ")
    assert "ConnectionRefusedError" in line
    assert "waiting for postgresql" not in result.stdout


def test_root_user_without_password_fails(fresh_db: str, tmp_path: Path) -> None:
    env = base_env(fresh_db, "q", tmp_path / "models")
    del env["XAGENT_ROOT_PASSWORD"]
    line = _one_line_error(run_bootstrap(env, "migrate", "root-user"))
    assert "root_password" in line
    (run,) = _rows(fresh_db, "SELECT ok, error FROM bootstrap_runs")
    assert run["ok"] is False
    assert "root_password" in str(run["error"])


@pytest.fixture
def model_server() -> Iterator[FileServer]:
    srv = FileServer().start()
    yield srv
    srv.stop()


def test_models_step_downloads_resumes_and_skips(
    fresh_db: str, tmp_path: Path, model_server: FileServer
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    model_server.files["weights.bin"] = data
    model_server.drop_first_after["weights.bin"] = 700_000
    spec = {
        "name": "weights.bin",
        "url": model_server.url("weights.bin"),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    models_dir = tmp_path / "models"
    env = base_env(fresh_db, "q", models_dir, XAGENT_MODELS=json.dumps([spec]))
    first = run_bootstrap(env, "all")
    assert first.returncode == 0, first.stderr
    assert "resuming at 700000 bytes" in first.stdout
    assert (models_dir / f"weights.bin@{spec['sha256'][:32]}").read_bytes() == data
    second = run_bootstrap(env, "models")
    assert second.returncode == 0
    assert "models: weights.bin present" in second.stdout
    assert len(model_server.requests) == 2


def test_concurrent_models_runs_download_each_file_once(
    fresh_db: str, tmp_path: Path, model_server: FileServer
) -> None:
    """The boot unit and a release's unit on one host: the second waits for the models
    directory lock, then finds every file verified; each file is fetched once."""
    big, small = os.urandom(1_500_000), os.urandom(300_000)
    model_server.files.update({"big.bin": big, "small.bin": small})
    model_server.stall_at["big.bin"] = 500_000  # the first run holds the lock until resumed
    specs = [
        {"name": name, "url": model_server.url(name), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in [("big.bin", big), ("small.bin", small)]
    ]
    models_dir = tmp_path / "models"
    env = base_env(fresh_db, "q", models_dir, XAGENT_MODELS=json.dumps(specs))
    argv = [str(BIN / "xagent-bootstrap"), "models"]
    first = Proc("models-1", argv, env, tmp_path)
    second: Proc | None = None
    try:
        wait_until(lambda: model_server.requests, timeout=60, what="the first download")
        second = Proc("models-2", argv, env, tmp_path)
        waiting = second  # for the closure's type
        wait_until(
            lambda: (
                "another bootstrap on this host" in waiting.log()
                or len(model_server.requests) > 1
                or waiting.popen.poll() is not None
            ),
            timeout=60,
            what="the second run to wait or download",
        )
        assert len(model_server.requests) == 1, model_server.requests
        model_server.resume()
        assert first.popen.wait(60) == 0, first.log()
        assert second.popen.wait(60) == 0, second.log()
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert sorted((r.path, r.range) for r in model_server.requests) == [
        ("big.bin", None),
        ("small.bin", None),
    ]
    assert "models: big.bin downloaded, small.bin downloaded" in first.log()
    assert "models: big.bin present, small.bin present" in second.log()
    assert (models_dir / f"big.bin@{specs[0]['sha256'][:32]}").read_bytes() == big


def test_models_step_wrong_checksum_fails(
    fresh_db: str, tmp_path: Path, model_server: FileServer
) -> None:
    model_server.files["w.bin"] = b"not what you expected" * 1000
    spec = {"name": "w.bin", "url": model_server.url("w.bin"), "sha256": "ab" * 32}
    models_dir = tmp_path / "models"
    env = base_env(fresh_db, "q", models_dir, XAGENT_MODELS=json.dumps([spec]))
    line = _one_line_error(run_bootstrap(env, "models"))
    assert "w.bin: sha256 mismatch" in line
    assert [p.name for p in models_dir.iterdir() if p.name != ".lock"] == []


def test_check_config(tmp_path: Path) -> None:
    env = base_env("postgresql+asyncpg://x@127.0.0.1/x", "q", tmp_path)
    ok = run_bootstrap(env, "--check-config")
    assert ok.returncode == 0
    assert ok.stdout.strip() == "settings ok"
    env["XAGENT_STREAM_XREAD_COUNT"] = "0"
    line = _one_line_error(run_bootstrap(env, "--check-config"))
    assert "XAGENT_STREAM_XREAD_COUNT: Input should be greater than or equal to 1" in line


def test_a_changed_root_password_is_applied(fresh_db: str, tmp_path: Path) -> None:
    """Rotating root_password is a deploy: the next bootstrap gives the account the
    configured password (the old one stops working); the same password changes nothing."""
    env = base_env(fresh_db, "q", tmp_path / "models", XAGENT_ROOT_PASSWORD="first-password")
    assert run_bootstrap(env, "migrate", "root-user").returncode == 0
    env["XAGENT_ROOT_PASSWORD"] = "second-password"
    rotated = run_bootstrap(env, "root-user")
    assert rotated.returncode == 0, rotated.stderr
    assert "password set to root_password" in rotated.stdout
    (row,) = _rows(fresh_db, "SELECT password_hash FROM users WHERE username = 'root'")
    assert verify_password("second-password", str(row["password_hash"]))
    assert not verify_password("first-password", str(row["password_hash"]))
    again = run_bootstrap(env, "root-user")
    assert "'root' exists, nothing to do" in again.stdout
    (same,) = _rows(fresh_db, "SELECT password_hash FROM users WHERE username = 'root'")
    assert same["password_hash"] == row["password_hash"]
